package main

import (
	"net"
	"os"
	"os/exec"
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
)

// TestDeployFilesAgreeWithTheCode: nothing here builds the image (no
// registry on this machine), so the Dockerfile and the systemd unit are
// checked against the code: the port, the binary's path, the config's
// path, the health check and the state file's variable.
func TestDeployFilesAgreeWithTheCode(t *testing.T) {
	docker, err := os.ReadFile("../../Dockerfile")
	require.NoError(t, err)
	unit, err := os.ReadFile("../../deploy/systemd/llproxy.service")
	require.NoError(t, err)
	d := string(docker)

	_, port, err := net.SplitHostPort(config.DefaultListen)
	require.NoError(t, err)
	assert.Regexp(t, `(?m)^EXPOSE `+port+`$`, d, "the port llproxy listens on by default")
	assert.Contains(t, d, `"http://127.0.0.1:`+port+`/healthz"`)

	bin := regexp.MustCompile(`(?m)^COPY --from=build \S+ (\S+)$`).FindStringSubmatch(d)
	require.NotNil(t, bin, "the binary is copied from the build stage")
	assert.Contains(t, d, `ENTRYPOINT ["`+bin[1]+`"]`)
	assert.Contains(t, d, `CMD ["`+bin[1]+`", "healthcheck"`)
	cfg := regexp.MustCompile(`(?m)^COPY config-example\.json (\S+)$`).FindStringSubmatch(d)
	require.NotNil(t, cfg)
	assert.Contains(t, d, `CMD ["-config", "`+cfg[1]+`"]`)
	assert.Regexp(t, `(?m)^USER [1-9]`, d, "not root")
	assert.Contains(t, d, "CGO_ENABLED=0", "a static binary")

	u := string(unit)
	assert.Contains(t, u, "ExecStart="+bin[1]+" -config "+cfg[1])
	assert.Contains(t, u, "Restart=on-failure")
	assert.Contains(t, u, "ExecReload=/bin/kill -HUP $MAINPID", "SIGHUP reloads")
	for _, file := range []string{d, u} {
		m := regexp.MustCompile(`LLPROXY_STATE_FILE=(\S+)`).FindStringSubmatch(file)
		require.NotNil(t, m)
		// The variable is honoured: the state file goes where it says.
		c, err := config.Load("../../config-example.json", func(k string) (string, bool) {
			if k == "LLPROXY_STATE_FILE" {
				return m[1], true
			}
			return "", false
		})
		require.NoError(t, err)
		assert.Equal(t, m[1], c.StateFile)
	}

	// The health check the image runs works against a real llproxy.
	binPath := build(t)
	cmd, addr, _ := startExample(t)
	defer cmd.Process.Kill()
	out, err := exec.Command(binPath, "healthcheck", "-url", "http://"+addr+"/healthz").CombinedOutput()
	assert.NoError(t, err, string(out))
	out, err = exec.Command(binPath, "healthcheck", "-url", "http://"+addr+"/nope").CombinedOutput()
	assert.Error(t, err, string(out))
}
