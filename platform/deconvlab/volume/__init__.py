"""The volume wing: whole-volume inference, clean-up, metrics and the per-case report of the MRI patch nets.

``dense`` labels a volume tile by tile, ``cleanup`` refines a label map, ``metrics`` scores it per label
region and ``report`` tabulates cases. The label regions are always a parameter (the task passes its
own); nothing here knows a data set's convention.
"""
