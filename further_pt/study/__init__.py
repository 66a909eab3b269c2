"""Study: Sun et al.'s Table 6 on your data. Runs pretrain -> fine-tune -> evaluate per
variant and seed (:mod:`.experiment`), the TF-IDF reference (:mod:`.linear`), sweeps
(:mod:`.sweep`), and the report with its paired statistics and plots.
"""
