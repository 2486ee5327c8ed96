"""Where data, models, index and refresher meet: LightningModules, callbacks, CLI glue."""
