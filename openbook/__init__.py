"""openbook: end-to-end training of retrieval-augmented LMs with asynchronous index refresh.

Submodules import heavy dependencies (torch, faiss, ray) lazily; importing
``openbook`` itself is cheap so the CLI starts fast.
"""

__version__ = "0.1.0"
