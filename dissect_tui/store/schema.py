"""The DuckDB cache schema: a documented public interface (see README, "The cache file").

Bump SCHEMA_VERSION on any change that breaks a documented query; readers refuse other
versions with a clear message instead of failing on a missing column.
"""

from __future__ import annotations

import functools
import re

SCHEMA_VERSION = 2
# Versions this dissect-tui reads. 1 -> 2 added runs.template and the meta 'format' marker; a
# version-1 cache is read as is (the template of its runs is recovered from clip_key) and is
# upgraded in its copy when relabel or evaluate extends it.
READABLE_VERSIONS = (1, 2)

# Written into meta by dissect-tui only: together with schema_version it identifies a file as a
# dissect-tui cache (a user's DuckDB file with a table named meta is never mistaken for one).
FORMAT_KEY = "format"
FORMAT_VALUE = "dissect-tui cache"

# Tables, in creation order. The embedding width D is only known at index time, so
# image/concept embeddings are created by `embedding_tables(dim)`.
TABLES = """
CREATE TABLE meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR
);
CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY,
    kind VARCHAR NOT NULL,              -- 'index' or 'relabel'
    parent_run_id INTEGER,              -- relabel: the run whose activations were reused
    created_at TIMESTAMP NOT NULL,
    software_version VARCHAR,
    target VARCHAR,                     -- model name or custom factory as given
    target_weights VARCHAR,
    clip_model VARCHAR,
    clip_pretrained VARCHAR,
    clip_key VARCHAR,                   -- identity of the text tower + template (keys concept_embeddings)
    probe VARCHAR,                      -- JSON list of --probe specs
    n_images INTEGER,
    n_failed_images INTEGER,
    concept_set VARCHAR,
    n_concepts INTEGER,
    layers VARCHAR[],
    pool VARCHAR,
    similarity VARCHAR,
    hyperparameters VARCHAR,            -- JSON
    cutoff DOUBLE,
    device VARCHAR,
    precision VARCHAR,
    batch_size INTEGER,
    stage_seconds VARCHAR,              -- JSON {stage: seconds}
    settings VARCHAR,                   -- JSON of every setting of the command
    template VARCHAR                    -- prompt template of the concept texts, NULL: as written
);
CREATE TABLE layers (
    layer VARCHAR PRIMARY KEY,
    position INTEGER NOT NULL,
    n_units INTEGER NOT NULL,
    module_type VARCHAR,
    output_shape VARCHAR,
    pool VARCHAR
);
CREATE TABLE images (
    image_id INTEGER PRIMARY KEY,
    path VARCHAR NOT NULL,
    source VARCHAR,
    width INTEGER,
    height INTEGER,
    ok BOOLEAN NOT NULL,
    error VARCHAR
);
CREATE TABLE thumbnails (
    image_id INTEGER PRIMARY KEY,
    jpeg BLOB NOT NULL,
    width INTEGER,
    height INTEGER
);
CREATE TABLE concepts (
    concept_id INTEGER PRIMARY KEY,
    text VARCHAR NOT NULL UNIQUE
);
CREATE TABLE run_concepts (
    run_id INTEGER NOT NULL,
    position INTEGER NOT NULL,
    concept_id INTEGER NOT NULL
);
CREATE TABLE activation_rows (
    layer VARCHAR NOT NULL,
    image_id INTEGER NOT NULL,
    acts FLOAT[] NOT NULL
);
CREATE TABLE top_images (
    layer VARCHAR NOT NULL,
    unit INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    activation FLOAT NOT NULL
);
CREATE TABLE neurons (
    run_id INTEGER NOT NULL,
    layer VARCHAR NOT NULL,
    unit INTEGER NOT NULL,
    label VARCHAR NOT NULL,
    concept_id INTEGER NOT NULL,
    similarity DOUBLE NOT NULL,
    interpretable BOOLEAN NOT NULL
);
CREATE TABLE neuron_concepts (
    run_id INTEGER NOT NULL,
    layer VARCHAR NOT NULL,
    unit INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    concept_id INTEGER NOT NULL,
    score FLOAT NOT NULL
);
CREATE TABLE image_concepts (
    run_id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    concept_id INTEGER NOT NULL,
    similarity FLOAT NOT NULL
);
CREATE TABLE image_softmax (
    run_id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    lse FLOAT NOT NULL
);
CREATE TABLE linear_weights (
    layer VARCHAR NOT NULL,
    input_layer VARCHAR,
    unit INTEGER NOT NULL,
    weight FLOAT[] NOT NULL,
    bias FLOAT
);
CREATE TABLE metrics (
    run_id INTEGER NOT NULL,
    analysis VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    value DOUBLE,
    details VARCHAR
);
"""


# Relations a cache may lack: a file built before they existed is still complete (the reader does
# not require them). New caches get them empty; the command that fills one creates it if missing.
OPTIONAL_TABLES = """
CREATE TABLE IF NOT EXISTS compositions (
    run_id INTEGER NOT NULL,
    layer VARCHAR NOT NULL,
    unit INTEGER NOT NULL,
    breadth INTEGER NOT NULL,           -- how many of the neuron's top concepts were paired
    kind VARCHAR NOT NULL,              -- 'pair' or 'single'
    rank INTEGER NOT NULL,              -- 1 = best of its kind
    text VARCHAR NOT NULL,
    score DOUBLE NOT NULL,              -- SoftWPMI over the neuron's singles and their pairs
    created_at TIMESTAMP NOT NULL
);
"""

OPTIONAL_RELATIONS = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", OPTIONAL_TABLES))


def embedding_tables(dim: int) -> str:
    """Embedding tables use fixed-size arrays so array_inner_product works on them."""
    return f"""
CREATE TABLE image_embeddings (
    image_id INTEGER PRIMARY KEY,
    emb FLOAT[{int(dim)}] NOT NULL
);
CREATE TABLE concept_embeddings (
    clip_key VARCHAR NOT NULL,
    concept_id INTEGER NOT NULL,
    emb FLOAT[{int(dim)}] NOT NULL,
    PRIMARY KEY (clip_key, concept_id)
);
"""


# Views are cheap conveniences over the tables; P is computed lazily, never stored.
VIEWS = """
CREATE VIEW activations AS
    SELECT layer, unnest(range(len(acts))) AS unit, image_id, unnest(acts) AS value
    FROM activation_rows;
CREATE VIEW p AS
    SELECT i.image_id, c.concept_id, array_inner_product(i.emb, c.emb) AS similarity
    FROM image_embeddings i
    JOIN concept_embeddings c ON c.clip_key = (SELECT clip_key FROM runs ORDER BY run_id LIMIT 1);
CREATE VIEW latest_run AS
    SELECT * FROM runs ORDER BY run_id DESC LIMIT 1;
CREATE VIEW latest_neurons AS
    SELECT n.* FROM neurons n WHERE n.run_id = (SELECT max(run_id) FROM runs);
"""

# Columns added by each schema version, per relation: older caches are read without them.
ADDED_IN = {2: {"runs": ("template",)}}

# Documented relation names (docs/SQL.md documents each; tests check the list against it). The reader
# derives what it requires of a file from the DDL above, not from this list.
RELATIONS = (
    "meta runs layers images thumbnails concepts run_concepts image_embeddings concept_embeddings "
    "activation_rows activations p top_images neurons neuron_concepts image_concepts image_softmax "
    "linear_weights metrics compositions latest_run latest_neurons"
).split()


@functools.cache
def _columns_of_ddl() -> dict[str, tuple[str, ...]]:
    """Every table and its columns, and every view (no columns: a view is checked by name), read
    from the DDL above. Each column is one line of a CREATE TABLE that starts with its name."""
    out: dict[str, tuple[str, ...]] = {}
    for table, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\);", TABLES + embedding_tables(2), re.S):
        lines = (line.strip() for line in body.splitlines())
        out[table] = tuple(line.split()[0] for line in lines if line and not line.startswith("PRIMARY KEY"))
    for view in re.findall(r"CREATE VIEW (\w+) AS", VIEWS):
        out[view] = ()
    return out


def expected_columns(version: int) -> dict[str, tuple[str, ...]]:
    """relation -> columns a cache of this schema version has (from the DDL, less later additions)."""
    columns = dict(_columns_of_ddl())
    for added_in, relations in ADDED_IN.items():
        if version < added_in:
            for relation, names in relations.items():
                columns[relation] = tuple(c for c in columns[relation] if c not in names)
    return columns
