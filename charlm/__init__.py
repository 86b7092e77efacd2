"""charlm: character- and word-level recurrent language models (RNN, GRU, LSTM).

Data flows one way: a UTF-8 corpus -> `tokenizer` -> `data` (token streams and
BPTT windows) -> `model` (embedding, recurrent stack from `cells` or torch.nn,
decoder) -> `train` -> a run folder written by `checkpoint` -> `sample` and
`score`. `cli` is the command-line front end over these modules.
"""

__version__ = "0.1.0"
