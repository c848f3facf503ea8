"""Test oracle: numpy's legacy RandomState shuffles and pairwise summation, printed as JSON."""
import json

import numpy

x = numpy.arange(10)
numpy.random.RandomState(1234).shuffle(x)
big = numpy.arange(100000)
numpy.random.RandomState(7).shuffle(big)
w = numpy.array([1.0 / (i * 0.7 + 0.13) for i in range(1, 301)])
print(json.dumps({
    "shuffle_1234_10": x.tolist(),
    "shuffle_7_100000_head": big[:20].tolist(),
    "pairwise_sum_300": float(numpy.sum(w)),
}))
