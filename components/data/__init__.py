"""Stage 0, data: find, check, version and split the images (numpy and Pillow; no torch).

`stage.prepare` is the DVC `prepare` stage; `folders.scan` makes the split the flow trains on."""
