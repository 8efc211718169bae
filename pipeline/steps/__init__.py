"""Things indexed by training step: the generic append-only step store (``store``)."""
