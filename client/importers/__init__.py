"""Importers: a hospital's cardiac cine MRI, in the layout its dataset or scanner export
uses, turned into a fedsynth site folder (manifest.csv + one 3D NIfTI per phase).

Everything runs at the site and writes only into the site's own folder: nothing read or
computed here leaves it. One module per job: `volumes` reads 3D and 4D NIfTI within
data.max-voxels, `labels` converts label conventions, `measures` derives the clinical
attributes from label maps, `tables` reads every CSV alike, `records` reads the site's
own CSV of what a dataset lacks, `acdc`/`mnms`/`ukbb`/`cine` find the subjects of each
layout, `site_folder` writes the folder, `run` ties them together.
"""
