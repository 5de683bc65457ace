// Package ollama serves Ollama's API (/api/chat, /api/generate, /api/tags,
// /api/show, /api/ps, /api/version) over every model llproxy routes, for
// tools that only speak Ollama. Requests are translated to OpenAI chat
// completions and sent through the gateway, so they meet the same queues,
// limits and backends as everyone else's; answers are translated back,
// streamed as NDJSON or as one JSON object.
//
// It exists as its own package because the translation is a protocol of its
// own with nothing to do with scheduling; it reaches the gateway through the
// small Gateway interface it defines.
package ollama

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"time"
)

// Version is what GET /api/version reports: recent enough for clients
// that check for tool support and structured outputs.
const Version = "0.9.0"

// Gateway is what the façade needs of llproxy.
type Gateway interface {
	// ServeChat serves an OpenAI chat completions request body for model
	// through the route that serves it, writing the OpenAI answer (JSON or
	// SSE, or an OpenAI error) to w. r carries the client's context and
	// headers.
	ServeChat(w http.ResponseWriter, r *http.Request, model string, body []byte)
	// Models lists the models the gateway routes, by the names clients
	// use; Known says whether one is routed.
	Models() []string
	Known(model string) bool
	// Load gets model's server running if llproxy runs it (an Ollama
	// load request), keeping it loaded for keepAlive if given; Unload
	// stops it (at once if idle, else after its last request). Both are
	// the requesting client's to ask (r carries its key): a *Refusal
	// says it may not.
	Load(r *http.Request, model string, keepAlive *time.Duration) error
	Unload(r *http.Request, model string) error
	// Running lists the models that are loaded now, with when each will
	// be unloaded (zero: not on a timer).
	Running() []Loaded
}

// Refusal is a load or unload the gateway does not allow the client:
// answered with Status (403) and Message in Ollama's error shape.
type Refusal struct {
	Status  int
	Message string
}

func (e *Refusal) Error() string { return e.Message }

// Loaded is a model /api/ps reports.
type Loaded struct {
	Name      string
	ExpiresAt time.Time
}

// Handler serves the Ollama API. It is safe for concurrent use.
type Handler struct {
	gw      Gateway
	started time.Time
	now     func() time.Time
}

// New returns the façade over gw.
func New(gw Gateway) *Handler {
	return &Handler{gw: gw, started: time.Now(), now: time.Now}
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/" && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "Ollama is running")
	case r.URL.Path == "/api/version" && r.Method == http.MethodGet:
		writeJSON(w, http.StatusOK, map[string]string{"version": Version})
	case r.URL.Path == "/api/tags" && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		h.tags(w)
	case r.URL.Path == "/api/ps" && r.Method == http.MethodGet:
		h.ps(w)
	case r.URL.Path == "/api/show" && r.Method == http.MethodPost:
		h.show(w, r)
	case r.URL.Path == "/api/chat" && r.Method == http.MethodPost:
		h.chat(w, r, false)
	case r.URL.Path == "/api/generate" && r.Method == http.MethodPost:
		h.chat(w, r, true)
	default:
		writeError(w, http.StatusNotFound, "404 page not found")
	}
}

// modelEntry is one model as /api/tags and /api/ps list it.
type modelEntry struct {
	Name       string    `json:"name"`
	Model      string    `json:"model"`
	ModifiedAt time.Time `json:"modified_at"`
	Size       int64     `json:"size"`
	Digest     string    `json:"digest"`
	Details    details   `json:"details"`
	ExpiresAt  time.Time `json:"expires_at,omitzero"`
	SizeVRAM   *int64    `json:"size_vram,omitempty"`
}

type details struct {
	ParentModel       string   `json:"parent_model"`
	Format            string   `json:"format"`
	Family            string   `json:"family"`
	Families          []string `json:"families"`
	ParameterSize     string   `json:"parameter_size"`
	QuantizationLevel string   `json:"quantization_level"`
}

func (h *Handler) entry(name string) modelEntry {
	sum := sha256.Sum256([]byte(name))
	return modelEntry{Name: name, Model: name, ModifiedAt: h.started, Digest: hex.EncodeToString(sum[:]),
		Details: details{Format: "gguf", Families: []string{}}}
}

func (h *Handler) tags(w http.ResponseWriter) {
	models := []modelEntry{}
	for _, name := range h.gw.Models() {
		models = append(models, h.entry(name))
	}
	writeJSON(w, http.StatusOK, map[string]any{"models": models})
}

// ps lists the loaded models: those of the servers llproxy runs that are
// up, and every model of servers it does not run (always available). A
// model on no timer expires, as in Ollama with keep_alive -1, far ahead.
func (h *Handler) ps(w http.ResponseWriter) {
	models := []modelEntry{}
	var zero int64
	for _, l := range h.gw.Running() {
		e := h.entry(l.Name)
		e.ExpiresAt, e.SizeVRAM = l.ExpiresAt, &zero
		if e.ExpiresAt.IsZero() {
			e.ExpiresAt = h.now().AddDate(100, 0, 0)
		}
		models = append(models, e)
	}
	writeJSON(w, http.StatusOK, map[string]any{"models": models})
}

func (h *Handler) show(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model string `json:"model"`
		Name  string `json:"name"` // older clients
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "invalid request: "+err.Error())
		return
	}
	if req.Model == "" {
		req.Model = req.Name
	}
	if !h.gw.Known(req.Model) {
		writeError(w, http.StatusNotFound, "model '"+req.Model+"' not found")
		return
	}
	e := h.entry(req.Model)
	writeJSON(w, http.StatusOK, map[string]any{
		"modelfile":    "# Served by llproxy, which routes this model to an OpenAI-compatible server.\nFROM " + req.Model + "\n",
		"parameters":   "",
		"template":     "{{ .Prompt }}",
		"details":      e.Details,
		"model_info":   map[string]any{"general.architecture": "", "general.name": req.Model},
		"capabilities": []string{"completion", "tools"},
		"modified_at":  e.ModifiedAt,
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// writeError writes Ollama's error shape, {"error": "..."}.
func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}
