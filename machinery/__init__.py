"""The machinery behind the chapters: what a real run needs besides the recipe
(checkpoints, torchrun, data at scale, fail-early checks, evaluation, the demo,
the exercises). A reader may skip this folder; the chapters never import it."""
