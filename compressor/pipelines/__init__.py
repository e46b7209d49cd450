"""The top floor: the user-facing actions, each a readable recipe over the mechanics below.

- `source.calibrate(CalibrationConfig) -> Source`: the checkpoint loaded once, its fingerprint, importance
  and held-out batches (`compress importance`, and the first step of `prune` and `search`);
- `pruning.prune_to_budget(source, PruneConfig, out) -> CompressionRecord` and `pruning.plan` (a dry run on
  a config alone): `compress prune`;
- `search.run_search(source, SearchConfig, out) -> SearchRecord` and `search.materialize`: `compress search`
  and `compress materialize`;
- `ranking.rank`: the check / cost / score / sort loop every strategy's proposals go through;
- `records`: the typed records these write (`compression.json`, `search.json`);
- `plots.plot_pareto`: a search's figure (`pareto.png`), drawn by the command line from the returned record.

Dependencies run one way: pipelines -> strategies -> mechanics (`compressor.*`); nothing below imports
this package or `strategies`.
"""
