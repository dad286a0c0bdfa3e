"""``x2edit build-data``: sources -> task sampler -> experts -> instruction writers -> scorers ->
filters -> WebDataset shards, on a local or a Ray engine; and Shape World, its offline world.

    from x2edit.data_pipeline.shapeworld import ShapeWorld          # exact editing pairs for every task
    from x2edit.data_pipeline.shards import read_shards, read_index  # read what build-data wrote
    from x2edit.data_pipeline.config import load_config
    from x2edit.data_pipeline.runner import build                    # what the CLI runs

See docs/build_data.md.
"""
