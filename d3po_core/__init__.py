"""D3PO Studio engine: sampling with log-probs, the D3PO objective, LoRA rounds, sessions.

The engine imports no UI library; the Gradio app and the notebook panels sit on top of it.
"""

import logging

__version__ = "0.1.0"

# Importing diffusers touches transformers' image processors, which warn that torchvision is
# missing and fall back to PIL; no model here uses an image processor, so the note is noise.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
