"""D3PO Studio's front ends: the Gradio app and the notebook panels, over one controller."""
