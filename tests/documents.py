"""Real English text for tokenizer tests, from the standard library."""

import inspect


def stdlib_documents():
    """A few hundred documents of real English: the docstrings of some standard modules."""
    import argparse as m1, collections as m2, json as m3, pathlib as m4, subprocess as m5
    import textwrap as m6, unittest as m7, logging as m8, functools as m9, typing as m10

    documents = []
    for module in (m1, m2, m3, m4, m5, m6, m7, m8, m9, m10):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if not isinstance(obj, str) else None
            if doc and len(doc) > 80 and doc not in documents:
                documents.append(doc)
    return documents
