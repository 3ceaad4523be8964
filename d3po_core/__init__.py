"""D3PO Studio engine: sampling with log-probs, the D3PO objective, LoRA rounds, sessions.

The engine imports no UI library; the Gradio app and the notebook panels sit on top of it.
"""

__version__ = "0.1.0"
