"""Training data: local documents -> tokens -> packed rows with segment ids and positions.

grain is imported only when a grain pipeline is built, so synthetic data works without it.
"""

from jaxprefill.data.corpus import build_corpus
from jaxprefill.data.pipeline import Loader, make_dataset, make_loader
from jaxprefill.data.sources import open_source
from jaxprefill.data.synthetic import SyntheticLoader
from jaxprefill.data.tokenize import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "Loader", "SyntheticLoader", "build_corpus",
           "make_dataset", "make_loader", "make_tokenizer", "open_source"]
