"""The label of a position that takes no loss: packing writes it (after each end of document), the model's and the
vocab-parallel cross-entropy skip it. torch's cross-entropy default. (Its own module: the model imports it without
the data pipeline's numpy.)"""

IGNORE_INDEX = -100
