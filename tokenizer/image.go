package tokenizer

import (
	"bytes"
	"encoding/base64"
	"image"
	_ "image/gif" // register decoders: only DecodeConfig (the header) is used
	_ "image/jpeg"
	_ "image/png"
	"math"
	"strings"
)

// imageModel holds the image-token constants of one model family (the
// images-vision guide): tile models charge base + tiles x tile; patch models
// charge 32-px patches, capped at 1536, times a multiplier.
type imageModel struct {
	prefix     string
	base, tile int
	patchMult  float64 // > 0 for patch models
}

// imageModels is checked in order; the first prefix that matches wins, so
// the "-mini" families come before their parents.
var imageModels = []imageModel{
	{prefix: "gpt-4o-mini", base: 2833, tile: 5667},
	{prefix: "gpt-4.1-mini", patchMult: 1.62},
	{prefix: "gpt-5-mini", patchMult: 1.62},
	{prefix: "gpt-4.1-nano", patchMult: 2.46},
	{prefix: "gpt-5-nano", patchMult: 2.46},
	{prefix: "o4-mini", patchMult: 1.72},
	{prefix: "gpt-5", base: 70, tile: 140},
	{prefix: "o1", base: 75, tile: 150},
	{prefix: "o3", base: 75, tile: 150},
	{prefix: "computer-use-preview", base: 65, tile: 129},
	{prefix: "", base: 85, tile: 170}, // gpt-4o, gpt-4.1, gpt-4.5 and unknown models
}

const maxPatches = 1536

// imageTokens returns the token cost of one image input. The size of a data:
// URL image is read from its header; a remote image is not fetched, so it is
// charged the most any image can cost at that detail (an upper bound).
func imageTokens(model string, url, detail []byte) int {
	m := imageModels[len(imageModels)-1]
	for _, im := range imageModels {
		if strings.HasPrefix(model, im.prefix) {
			m = im
			break
		}
	}
	w, h, known := dataURLSize(url)
	if m.patchMult > 0 {
		patches := maxPatches
		if known {
			patches = imagePatches(w, h)
		}
		return int(math.Ceil(float64(patches) * m.patchMult))
	}
	if string(detail) == "low" {
		return m.base
	}
	tiles := 8 // the most tiles any image has after fitting 2048x2048 and 768 on the short side
	if known {
		tiles = imageTiles(w, h)
	}
	return m.base + tiles*m.tile
}

// imageTiles follows the high-detail procedure: fit within 2048x2048, scale
// the shortest side down to 768, count 512-px tiles.
func imageTiles(w, h int) int {
	fw, fh := float64(w), float64(h)
	if fw > 2048 || fh > 2048 {
		s := 2048 / math.Max(fw, fh)
		fw, fh = fw*s, fh*s
	}
	if short := math.Min(fw, fh); short > 768 {
		s := 768 / short
		fw, fh = fw*s, fh*s
	}
	return int(math.Ceil(fw/512) * math.Ceil(fh/512))
}

// imagePatches counts 32-px patches, shrinking the image to at most 1536.
func imagePatches(w, h int) int {
	fw, fh := float64(w), float64(h)
	p := math.Ceil(fw/32) * math.Ceil(fh/32)
	if p <= maxPatches {
		return int(p)
	}
	r := math.Sqrt(32 * 32 * maxPatches / (fw * fh))
	fw, fh = fw*r, fh*r
	// Scale again so that the width is a whole number of patches.
	adj := math.Floor(fw/32) / (fw / 32)
	fw, fh = fw*adj, fh*adj
	p = math.Ceil(fw/32) * math.Ceil(fh/32)
	return int(math.Min(p, maxPatches))
}

// dataURLSize reads the dimensions of a base64 data: URL image from its
// header, decoding only the bytes the header needs.
func dataURLSize(url []byte) (w, h int, ok bool) {
	const prefix = "data:"
	if !bytes.HasPrefix(url, []byte(prefix)) {
		return 0, 0, false
	}
	comma := bytes.IndexByte(url, ',')
	if comma < 0 || !bytes.HasSuffix(url[:comma], []byte(";base64")) {
		return 0, 0, false
	}
	dec := base64.NewDecoder(base64.StdEncoding, bytes.NewReader(url[comma+1:]))
	cfg, _, err := image.DecodeConfig(dec)
	if err != nil || cfg.Width <= 0 || cfg.Height <= 0 {
		return 0, 0, false
	}
	return cfg.Width, cfg.Height, true
}
