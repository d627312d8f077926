"""The command line: absl flags and config files -> `TrainConfig` -> `run`; the tasks it trains
(``--model``), the report and predict commands. `python -m distributed.train` and
`python -m distributed.report` are thin shims into this package."""
