"""Generation: requests to latents to images. :mod:`.engine` orchestrates (check, group, run the stages, decode,
describe); the pieces it calls each live in their own module: seeds, group keys, the prompt conditioning a pipeline
call takes, the pipeline stages, schedulers, the VAE decode and its quality guard, the metadata, and compilation
(:mod:`.acceleration`, :mod:`.fp8`)."""
