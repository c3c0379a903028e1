"""What one call may ask of the handler, by default: the ``handler:`` keys of an archive's
``model-config.yaml`` that bound a call's size, where the archive leaves them unset.

Read by the handler (``handlers/base.py``'s ``HandlerSettings``) and by the gateway, which
checks its policies and coalescing against an archive's limits at start
(``service/registry.py``): an unset key is this default, which the handler enforces, not
"no limit". Kept apart from ``handlers/base.py`` so that the gateway reads it without torch.
"""

MAX_FORWARD_BATCH = 256  # rows per forward call; a batch's rows go in chunks of this
MAX_VARIANTS = 2048  # variants one plan may ask for (rows - 1)
MAX_BATCH_ITEMS = 256  # images one ProbeBatch may carry
MAX_BATCH_ROWS = 8192  # rows (images x (1 + variants)) one ProbeBatch may ask for
