"""Plain-Python building blocks: data, model, training, evaluation, metrics, error analysis.

``core`` knows nothing about the loop or the strategies. Importing it loads no model.
"""
