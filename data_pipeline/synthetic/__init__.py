"""Built-in synthetic multimodal slides (CARS, TPEF, SHG) with the tissue-amount shortcut of real data.

`gerne-jax synthetic --out DIR --slides N --size PIXELS --seed S [--layout L]` writes, per
slide, a tiled interleaved (Y, X, 3) uint16 TIFF, a tiled uint8 0/1 tumour mask of the same height and
width, and `DIR/manifest.csv` in the format of `gerne_jax.slides.manifest` (relative paths, a
deterministic split). Two layouts:
- `classic` (the default; the first generator, byte for byte): tumour bodies among strands and
  debris. Non-tumour tissue is strands, fragments and bands of stroma beside tumour, and never looks
  like tumour, so a classifier errs only on tumour patches with little tissue.
- `sections`: tumour inside large tissue sections that also hold large non-tumour regions of full
  tissue, stroma, normal tissue and inflammation, whose textures lie part of the way from stroma to
  tumour (`Texture.toward`). Inflammation comes closest: dense nuclei and little collagen, with
  smaller nuclei and a smaller TPEF/CARS shift than tumour. Detached tumour clusters of a few cells
  and medium bodies, most with tumour, give tumour patches with little tissue; more strands than in
  `classic` keep most non-tumour patches nearly empty. A model that leans on the amount of tissue
  then errs on both minority groups.

How a slide is made (both layouts; `sections` puts sections where `classic` has large bodies):
- Geometry is a list of shapes (`SlideLayout`), sampled once per slide: two or three large tissue
  bodies and several medium ones (sizes relative to the slide) that carry nearly all the tumour, thin
  strands of torn tissue, and many small fragments and specks of debris (absolute sizes, counts
  growing with the area). Each shape is an ellipse with a lobed outline (a few angular harmonics),
  evaluated in a coordinate frame that is warped by smooth noise at three scales, so outlines are
  irregular down to single pixels. Tumour regions are shapes of their own, clipped to their body, so
  they reach the body's edge in places (tumour patches with little tissue) and leave normal tissue
  beside them (non-tumour patches with much tissue); strands give non-tumour patches with little
  tissue that survive tissue detection (most debris is below its small-object size, as on real
  slides).
- Pixels are rendered tile by tile (`TILE` pixels a side) and streamed to tifffile, so memory does not
  grow with the slide. All spatially coherent noise is lattice "value noise" whose lattice values are
  a hash of (slide key, lattice point): any tile can be rendered alone, tiles join without seams, and
  the result does not depend on the tile size. Per-pixel sensor noise comes from a generator seeded
  by (seed, slide, tile row, tile column).
- The signal a classifier can learn: tumour has a TPEF/CARS ratio about 15% higher than normal
  stroma, denser and larger nucleus-like dark blobs, and little SHG collagen; stroma carries SHG
  fibres. Each kind of tissue is a `Texture`; a per-pixel kind map (`TileGeometry.kind`) picks it.
  The background is dark with noise.

Calibration: with the tiler's default tissue detection, slides of 2048 pixels tiled at P = 64 give
tumour patches a median tissue ratio above 0.9, non-tumour patches below 0.1, and at tau = 0.1 about
4-8% of patches in each minority group (tests/pipeline/test_synthetic.py measures this). At P = 32 the group
of non-tumour patches with much tissue grows to ~15% (strands fill more of a small patch). Other
sizes shift the shares: body sizes scale with the slide, so at 1024 pixels P = 32 behaves like 2048
at 64 (at 1024 with P = 64 bodies span only a few patches), while strands, fragments and texture keep
their pixel sizes.

Calibration of `sections` (2048-pixel slides, P = 64, the tiler's tissue detection, 12 slides of
seed 0): median tissue ratio 0.88 for tumour patches and 0.06 for non-tumour ones, about 30% of
non-tumour patches with a tissue ratio >= 0.5 (classic: a few %), and at tau = 0.1 about 7% of
patches in the group (tumour, r < 0.1) and 27% in (non-tumour, r >= 0.1). The textures were set so
that ERM with the demo setting errs on both minority groups while its average accuracy stays above
0.9; docs/results.md gives its per-group test accuracies.

The same arguments always give byte-identical files. Modules by job: `noise` (hashed lattice noise),
`layouts` (a slide's shapes and textures), `rendering` (pixels of any window) and `writing` (the TIFFs,
masks and manifest; the `synthetic` command).
"""
