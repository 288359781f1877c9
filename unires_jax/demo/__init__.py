"""The web demo: upload an image, type a phrase, see the mask (`scripts/demo.py`; needs the `demo` extra).

`session.py` holds the checkpoint and its warm predict function, `inputs.py` checks what a person sends,
`answer.py` turns a model output into what the page shows, `examples.py` makes the example images and `app.py`
lays out the Gradio page. Only `app.py` imports Gradio.
"""
