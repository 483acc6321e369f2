rule metrics:
    """Held-out metrics for every non-empty subset of modalities (a region's test-split pixels or a
    training set's test-split samples)."""
    input:
        unpack(training_data),
        model=lambda wc: f"{MODELS}/{wc.region}/{task_of(wc.region)}/model.ckpt",
    output:
        metrics=report(
            f"{RESULTS}/{{region}}/metrics.csv",
            caption="../report/metrics.rst",
            category="2. Accuracy",
            subcategory="{region}",
            labels={"region": "{region}", "file": "metrics.csv"},
        ),
        confusion=report(
            f"{RESULTS}/{{region}}/confusion.csv",
            caption="../report/confusion.rst",
            category="2. Accuracy",
            subcategory="{region}",
            labels={"region": "{region}", "file": "confusion.csv"},
        ),
    params:
        p=params_json("metrics"),
        tags=[],
    log:
        f"logs/{{region}}/metrics.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m cropmap metrics --params {params.p:q} --model {input.model:q} --inputs {input:q}"
        " --out {output.metrics:q} --confusion {output.confusion:q} {params.tags:q} --log {log:q}"


rule area:
    """Error-adjusted area per class with 95 % CIs, user's / producer's / overall accuracy
    (stratified estimator, map classes as strata; reference: the labelled test-split pixels)."""
    input:
        map=f"{RESULTS}/{{region}}/map.tif",
        labels=rules.labels.output.tif,
    output:
        csv=report(
            f"{RESULTS}/{{region}}/area.csv",
            caption="../report/area.rst",
            category="3. Area",
            subcategory="{region}",
            labels={"region": "{region}", "file": "area.csv"},
        ),
        json=f"{RESULTS}/{{region}}/area.json",
    params:
        p=params_json("area"),
    log:
        f"logs/{{region}}/area.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m cropmap area --params {params.p:q} --map {input.map:q} --labels {input.labels:q}"
        " --out-csv {output.csv:q} --out-json {output.json:q} --log {log:q}"


rule coverage:
    """Nodata share, tiles without any sensor and months without data (coverage.json)."""
    input:
        map=f"{RESULTS}/{{region}}/map.tif",
        stack=rules.stack.output,
    output:
        report(
            f"{RESULTS}/{{region}}/coverage.json",
            caption="../report/coverage.rst",
            category="1. Maps",
            subcategory="{region}",
            labels={"region": "{region}", "file": "coverage.json"},
        ),
    params:
        p=params_json("coverage"),
    log:
        f"logs/{{region}}/coverage.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m cropmap coverage --params {params.p:q} --map {input.map:q} --stack-dir {input.stack:q}"
        " --out {output:q} --log {log:q}"


rule report:
    """HTML report of every region (self-contained): map, expected F1, availability, accuracy per
    sensor subset, confusion, area with CIs, what would help, training curves, coverage."""
    input:
        maps=expand(f"{RESULTS}/{{region}}/map.tif", region=REGIONS),
        metrics=expand(f"{RESULTS}/{{region}}/metrics.csv", region=labelled_regions()),
        confusion=expand(f"{RESULTS}/{{region}}/confusion.csv", region=labelled_regions()),
        area=expand(f"{RESULTS}/{{region}}/area.json", region=labelled_regions()),
        quicklooks=expand(f"{RESULTS}/{{region}}/quicklook.png", region=REGIONS),
        availability=expand(f"{DATA}/{{region}}/availability.json", region=REGIONS),
        expected=expand(f"{RESULTS}/{{region}}/expected_f1.tif", region=REGIONS),
        coverage=expand(f"{RESULTS}/{{region}}/coverage.json", region=REGIONS),
        summaries=sorted({report_files(r)["summary"] for r in REGIONS}),
    output:
        report(
            f"{RESULTS}/report.html",
            caption="../report/report_html.rst",
            category="4. Report",
            labels={"file": "report.html"},
        ),
    params:
        regions=lambda wc: dumps({r: report_files(r) for r in REGIONS}),
        compare=f"{RESULTS}/compare/table.csv",
    log:
        "logs/report.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m cropmap report --regions {params.regions:q} --compare {params.compare:q} --out {output:q} --log {log:q}"
