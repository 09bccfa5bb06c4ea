"""records/: the one typed definition of every on-disk record of a checkpoint.

- `names`      — folder and file names (`rank_{r}/`, `{prefix}_rank_{r}-{epoch}_{step}.{ext}`,
                 `hyper_param.safetensors`) and the one parser of each;
- `hyper`      — the whole-valued ("hyper") tensors a save holds and which names count as hyper;
- `rank_meta`  — `RankFileMeta`, the `__metadata__` self-description of a rank file;
- `commit`     — `committed.json` (`CommitRecord`, `CommittedSave`) and the per-rank `meta.json`;
- `scan`       — the one folder scanner: which save of a checkpoint folder to read.
- `iteration`  — MindSpore Transformers 2.x's Checkpoint 2.0 layout: `iteration_XXXXXXXX/` names,
                 the tracker, `common.json` (`CommonInfo`) and `metadata.json` (`IterationMetadata`).

Every writer and reader imports these; nobody else spells a key, a regex or a file name.
Pure Python over `storage/` (headers, atomic writes) and `layout/` (slices): no MindSpore.
"""
