"""The speed-targeted search: which units of a model to shrink, sparsify or narrow, under a latency budget.

``units`` partitions the weight layers into units that change together (a channel group with its
producers and its one consumer; otherwise a single layer); ``losses`` estimates, on calibration
data, what each option of each unit costs the model's output; ``knapsack`` picks one option per
unit under the measured latency budget; ``apply`` turns the choice into the verified passes that
make it. Latencies are measured by ``tilefx.lowering.latency`` (this package never imports TVM).
"""
