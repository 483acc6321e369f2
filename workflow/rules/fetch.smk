rule fetch:
    """Fetch every modality of a region from its source (synthetic, Earth Engine, STAC, files)."""
    input:
        # a files region's cubes: editing one reruns the fetch
        lambda wc: region_files(config, wc.region),
    output:
        raw=directory(f"{DATA}/{{region}}/raw"),
        availability=f"{DATA}/{{region}}/availability.json",
    params:
        p=params_json("fetch"),
        cache=f"{DATA}/{{region}}/.fetch",
    log:
        f"logs/{{region}}/fetch.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "python -m cropmap fetch --params {params.p:q} --raw-dir {output.raw:q} --cache-dir {params.cache:q}"
        " --availability {output.availability:q} --log {log:q}"
