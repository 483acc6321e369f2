rule predict:
    """Predict one tile with whichever modalities exist per pixel."""
    input:
        model=model_of,
        stack=rules.stack.output,
    output:
        f"{RESULTS}/{{region}}/tiles/{{tile}}.tif",
    params:
        p=params_json("predict"),
    log:
        f"logs/{{region}}/predict/{{tile}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpus(config["prediction"]),
    shell:
        "OMP_NUM_THREADS={threads} python -m cropmap predict --params {params.p:q} --model {input.model:q}"
        " --stack-dir {input.stack:q} --tile {wildcards.tile:q} --out {output:q} --log {log:q}"
