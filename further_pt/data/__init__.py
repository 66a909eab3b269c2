"""Data: everything between files on disk and batches of token ids.

Corpora (``data.train_files``) become documents, documents become NSP pairs or packed blocks
(cached by ``datasets``), batches are masked; labelled task files become examples with
label ids, cut to length by the long-text strategies. Tokenizers are loaded, trained or
extended here, and the corpus selection of kNN-TAPT reads here too. Nothing here builds a
model or a loss: that is :mod:`further_pt.objectives`.
"""
