"""Data: the embedded fictional world corpus, text sources, tokenized shards and the packing loader."""
