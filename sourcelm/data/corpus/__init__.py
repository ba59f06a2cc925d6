"""The demo corpus: fetched from Debian and npm packages, served on loopback and crawled into WARC files."""
