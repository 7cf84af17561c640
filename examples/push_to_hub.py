#!/usr/bin/env python
"""Upload a finished SmPO training output folder to the Hugging Face Hub.

    hf auth login                      # once (or: export HF_TOKEN=...)
    python examples/push_to_hub.py ./smpo-sdxl-lora --hub_model_id your-name/smpo-sdxl-lora [--private]

Generates a model card from training_config.json / training_metrics.json and uploads the weights, both JSON
files (local paths reduced to folder names), validation.png (when the run had validation prompts) and the card,
nothing else: checkpoint-* folders, tracker logs, evaluation results and other files stay local. The card is
written to the folder's README.md only once the upload succeeded (a failed push changes no file there). The
card's license is the base's for the public SDXL 1.0, SD 2.x and SD 1.4/1.5 bases; for any other base it says
`other` and asks you to state the base's license (--license). A folder whose save did not finish (no
training_metrics.json) is refused. The token
is taken from HF_TOKEN or the saved login only: there is deliberately no --hub_token flag, so it never lands
in shell history or process listings. Set HF_ENDPOINT to use another Hub endpoint.
Library equivalent: ``smpo_diffusers.hub.push_to_hub(output_dir, repo_id, private=...)``.
"""

import logging
import sys

from smpo_diffusers.hub import push_main

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    push_main(sys.argv[1:])
