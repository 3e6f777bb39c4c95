"""Code that the bundle's scripts share (peer networks, profiling, figures, the tiny data set's fields).

Scripts import it as ``scripts.<module>`` after putting the bundle root on ``sys.path``, as they do to find
``ran_bundle`` in the release zip; ``python -m monai.bundle run`` puts the bundle root there too, so the VoxelMorph
peer's training config, ``scripts/brain_voxelmorph.json`` (kept here, beside the network it names, not among the
bundle's own configs), can name ``scripts.peers.VoxelMorphDDF``. It is not part of the installed ``ran_bundle``
package.
"""
