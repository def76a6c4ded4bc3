"""`python -m minilora inspect SOURCE --tokenizer DIR`: the data inspector of minilora.data."""

from .data import main

main()
