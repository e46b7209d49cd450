"""The top floor: the user-facing actions, each a readable recipe over the mechanics below. Every command is
one pipeline function that starts from paths and a typed config (or a command's options as written) and
returns a typed record; `cli.py` only parses, calls it and renders.

- `describing.describe_model`: `compress info`;
- `estimating.estimate_model(model, EstimateConfig)`: `compress estimate`;
- `initializing.init_model(out, InitConfig)`: `compress init`;
- `evaluating.evaluate_checkpoints(models, LossEval | RetrievalEval | LmEvalTasks)`: `compress eval`;
- `generating.generate_text(model, GenerateConfig)`: `compress generate`;
- `importance.importance_or_preview(model, out, ImportanceRunOptions)`: `compress importance`, the folder
  written (`write_importance`) or the dry run's memory plan;
- `pruning.prune_or_preview(model, out, PruneOptions)`: `compress prune`, the pruned checkpoint
  (`prune_checkpoint`, then `prune_to_budget` on a calibrated source) or the dry run;
- `search.search_or_preview(model, out, SearchOptions)` and `search.materialize`: `compress search` and
  `compress materialize`; `library`: a search's blockwise-distilled block variants (`--bld`);
- `quantizing.quantize_checkpoint(model, QuantizeConfig, out)`: `compress quantize`;
- `training.train_or_preview(TrainConfig)`: `compress distill` and `compress train`;
- `preview`: the dry runs: memory plans per stage, and `plan`, the candidates a strategy would consider on a
  config alone;
- `source.calibrate(CalibrationConfig) -> Source`: the checkpoint loaded once, its fingerprint, importance
  and held-out batches (the first step of `importance`, `prune` and `search`);
- `ranking.rank`: the check / cost / score / sort loop every strategy's proposals go through;
- `records`: the typed records these write (`compression.json`, `search.json`);
- `plots.plot_pareto`: a search's figure (`pareto.png`), drawn by the command line from the returned record.

Dependencies run one way: pipelines -> strategies -> mechanics (`compressor.*`); nothing below imports
this package or `strategies`.
"""
