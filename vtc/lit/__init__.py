"""Lightning glue: the LightningModule, callbacks, trainer-side helpers."""
