PROBABILITIES = bool(config["prediction"]["probabilities"])


rule mosaic:
    """Mosaic the tiles into a Cloud-Optimized GeoTIFF, quicklook PNG and STAC item (and the
    per-class probability COG when prediction.probabilities is set)."""
    input:
        tiles=lambda wc: expand(f"{RESULTS}/{wc.region}/tiles/{{tile}}.tif", tile=region_tiles(wc.region)),
        model=model_of,
    output:
        map=f"{RESULTS}/{{region}}/map.tif",
        quicklook=report(
            f"{RESULTS}/{{region}}/quicklook.png",
            caption="../report/quicklook.rst",
            category="1. Maps",
            subcategory="{region}",
            labels={"region": "{region}", "file": "quicklook.png"},
        ),
        stac=f"{RESULTS}/{{region}}/map.json",
        **({"proba": f"{RESULTS}/{{region}}/probabilities.tif"} if PROBABILITIES else {}),
    params:
        p=params_json("mosaic"),
        proba=lambda wc: ["--proba", f"{RESULTS}/{wc.region}/probabilities.tif"] if PROBABILITIES else [],
    log:
        f"logs/{{region}}/mosaic.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m cropmap mosaic --params {params.p:q} --tiles {input.tiles:q} --model {input.model:q} --out {output.map:q}"
        " --quicklook {output.quicklook:q} --stac {output.stac:q} {params.proba:q} --log {log:q}"


rule maps:
    """Target: every region's map, with metrics and area estimates for regions that have labels,
    the metrics of every training set, and results/report.html."""
    input:
        expand(f"{RESULTS}/{{region}}/map.tif", region=REGIONS),
        expand(f"{RESULTS}/{{region}}/quicklook.png", region=REGIONS),
        expand(f"{RESULTS}/{{region}}/metrics.csv", region=labelled_regions() + TRAINING_SETS),
        expand(f"{RESULTS}/{{region}}/area.csv", region=labelled_regions()),
        expand(f"{RESULTS}/{{region}}/expected_f1.tif", region=REGIONS),
        expand(f"{RESULTS}/{{region}}/coverage.json", region=REGIONS),
        f"{RESULTS}/report.html",


rule expected_f1:
    """Per pixel, the held-out weighted F1 of the sensor subset that pixel was mapped with."""
    input:
        map=f"{RESULTS}/{{region}}/map.tif",
        metrics=lambda wc: f"{RESULTS}/{model_region(config, wc.region)}/metrics.csv",
    output:
        f"{RESULTS}/{{region}}/expected_f1.tif",
    log:
        f"logs/{{region}}/expected_f1.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m cropmap expected_f1 --map {input.map:q} --metrics {input.metrics:q} --out {output:q} --log {log:q}"
