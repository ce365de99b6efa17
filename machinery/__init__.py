"""The machinery behind the chapters: what a real run needs besides the recipe
(checkpoints, torchrun, data at scale, fail-early checks, evaluation, the demo,
the exercises, fast paths, the commands besides sft and dpo). A reader may skip
this folder: tulu.py calls into it, and the four model chapters never import it."""
