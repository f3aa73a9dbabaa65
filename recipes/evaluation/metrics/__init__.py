"""`evaluate` metric modules shipped with the kit.

Each sub-folder holds one self-contained metric script (standard library + `evaluate` + `datasets` only), so it can
be loaded offline by local path (``evaluate.load(<folder>)``) or copied to the Hub as is. Use
``recipes.evaluation.metric_loader.load_metric(name, config)`` to load one.
"""
