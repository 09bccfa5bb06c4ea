"""Training data: tokenizers (`tokenizer.json`), MindRecord datasets, and the tools that build them.

CLI: `python -m mindformers_st.data {train-tokenizer,pretrain,finetune,make-corpus}`.
MindSpore is imported only by the MindRecord functions that need it.
"""
