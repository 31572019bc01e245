"""The ``glyphs`` world: short upper-case words rendered as 16×48 text strips, judged by a real OCR model.

Model-free parts: :mod:`.words` (alphabet, seeded word list, train / held-out split), :mod:`.render` (Pillow
built-in font ground-truth renderer); :mod:`.teacher` trains the tiny SD3 teacher; :mod:`.world` is the world.
"""
