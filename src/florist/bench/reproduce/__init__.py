"""The FLoRIST paper's Dolly comparison, scaled to the machine at hand: `florist bench reproduce`.

Every cell of a grid (setting x row x seed) is a run directory under OUT/<setting>/<row>/seed<k>; a
finished cell holds summary.json and is skipped, so an interrupted grid resumes where it stopped.

- `grid`: the settings, rows, scales and grids, and which cells may be replayed;
- `running`: runs a grid's unfinished cells, each federation in its own process;
- `replay`: aggregates a source run's saved round-1 client adapters with another method, and evaluates;
- `cells`: reads a finished cell (or a report's stored record of it) as one flat record;
- `spectra`: the singular values of each round's exact aggregate, from saved client adapters;
- `report`: rows over seeds, tau chosen on validation loss, paired differences, results.md/json;
- `plots`: quality against bytes, ranks per layer, spectra per round.
"""
