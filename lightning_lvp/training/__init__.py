"""Lightning wiring: the LightningModules, their callbacks and the token-drop curriculum.

The only layer (with ``lightning_lvp.commands`` above it) that imports Lightning. Import rule
(docs/DESIGN.md): ``commands -> training -> eval / core``; nothing in ``eval/`` or the core imports
this package.
"""
