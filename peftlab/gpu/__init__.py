"""Getting onto a GPU: which torch build a machine's NVIDIA driver takes and whether the installed
torch really sees the GPU (:mod:`peftlab.gpu.driver`), and the offline bundle for GPU machines
without network (:mod:`peftlab.gpu.bundle`, with :mod:`peftlab.gpu.install` and
``run-gpu-checks.sh`` inside it), and what the GPU smoke sweep's records must show
(:mod:`peftlab.gpu.smoke`). All but the last are standard library only: ``noxfile.py`` and the
bundle's check script run them before peftlab's dependencies exist."""
