"""Small helpers every part uses: write-then-rename files, image-shape
checks, lazy package attributes, quiet framework logs. Imports nothing else
of keras_aim."""
