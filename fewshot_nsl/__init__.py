"""fewshot-nsl: few-shot image classification with Neural Similarity Learning.

Importing the package has no side effects: no data is read, no thread or
random state is touched. Everything that draws random numbers takes a
``torch.Generator``.
"""

__version__ = "0.1.0"
