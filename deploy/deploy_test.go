package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
)

// hostileMailFrom holds every character that broke the old sed templating.
const hostileMailFrom = `"Tom & Jerry" | Ops: team #1 <welcome@example.com>`

type deployBundle struct {
	log      string // the stand-in's record of calls
	manifest string // where the stand-in keeps the manifests it was given
	env      []string
}

// setupDeploy builds outboxctl once per test and puts testdata/gcloud first
// on PATH.
func setupDeploy(t *testing.T) *deployBundle {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	require.NoError(t, os.Mkdir(bin, 0o755))
	build := exec.Command("go", "build", "-o", filepath.Join(bin, "outboxctl"), "./outboxctl")
	out, err := build.CombinedOutput()
	require.NoError(t, err, string(out))
	wd, err := os.Getwd()
	require.NoError(t, err)
	require.NoError(t, os.Symlink(filepath.Join(wd, "testdata", "gcloud"), filepath.Join(bin, "gcloud")))
	b := &deployBundle{log: filepath.Join(dir, "calls"), manifest: filepath.Join(dir, "manifests")}
	require.NoError(t, os.Mkdir(b.manifest, 0o755))
	b.env = append(os.Environ(),
		"PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"),
		"OUTBOXCTL="+filepath.Join(bin, "outboxctl"),
		"FAKE_GCLOUD_LOG="+b.log, "FAKE_GCLOUD_DIR="+b.manifest,
		"GCP_PROJECT=my-project", "GCP_REGION=europe-west1", "TAG=abc1234",
		"MAIL_FROM="+hostileMailFrom,
	)
	return b
}

func (b *deployBundle) run(t *testing.T, env ...string) (string, error) {
	t.Helper()
	cmd := exec.Command("bash", "deploy.sh")
	cmd.Env = append(b.env, env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (b *deployBundle) calls(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile(b.log)
	require.NoError(t, err)
	return strings.Split(strings.TrimSpace(string(raw)), "\n")
}

func TestDeployScript(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash")
	}
	t.Parallel()

	t.Run("issues the README's calls and deploys every image by digest", func(t *testing.T) {
		t.Parallel()
		b := setupDeploy(t)
		out, err := b.run(t, "FAKE_SCHEDULER_JOBS=outbox-sendemail")
		require.NoError(t, err, out)
		require.Contains(t, out, "total 84 of max_connections 100", "the connection budget is printed")

		var got []string
		for _, c := range b.calls(t) {
			// Keep the verb: the arguments are checked below.
			fields := strings.Fields(strings.TrimPrefix(c, "--project my-project "))
			n := 4
			if len(fields) > 2 && fields[2] == "replace" {
				n = 3 // then a temporary file
			}
			got = append(got, strings.Join(fields[:min(n, len(fields))], " "))
			require.True(t, strings.HasPrefix(c, "--project my-project "), "every call names the project: %s", c)
		}
		require.Equal(t, []string{
			"builds submit --config deploy/cloudbuild.yaml",
			"artifacts docker images describe",
			"artifacts docker images describe",
			"artifacts docker images describe",
			"run jobs replace",
			"run jobs execute outbox-migrate",
			"run services replace",
			"run services replace",
			"run services replace",
			"run services add-iam-policy-binding createuser",
			"run services add-iam-policy-binding relay",
			"run services describe relay",
			"scheduler jobs describe outbox-relay",
			"scheduler jobs create http",
			"run services add-iam-policy-binding sendemail",
			"run services describe sendemail",
			"scheduler jobs describe outbox-sendemail",
			"scheduler jobs update http",
			"run services describe createuser",
		}, got)

		digest := regexp.MustCompile(`^europe-west1-docker\.pkg\.dev/my-project/outbox/(createuser|relay|sendemail)@sha256:[0-9a-f]{64}$`)
		for _, name := range []string{"migrate", "createuser", "relay", "sendemail"} {
			raw, err := os.ReadFile(filepath.Join(b.manifest, name+".yaml"))
			require.NoError(t, err)
			var m manifest
			require.NoError(t, yaml.Unmarshal(raw, &m), "%s renders to valid YAML", name)
			for _, c := range m.containers() {
				require.Regexp(t, digest, c.Image, "%s deploys by digest", name)
			}
			for _, line := range strings.Split(string(raw), "\n") {
				if !strings.HasPrefix(strings.TrimSpace(line), "#") {
					require.NotContains(t, line, "${", "%s has no placeholder left", name)
				}
			}
			if name == "sendemail" {
				require.Equal(t, hostileMailFrom, m.env()["MAIL_FROM"], "MAIL_FROM arrives as typed")
			}
		}
	})

	t.Run("stops with a clear message when the scheduler refuses, and creates nothing", func(t *testing.T) {
		t.Parallel()
		b := setupDeploy(t)
		out, err := b.run(t, "FAKE_DENY=scheduler jobs describe outbox-relay")
		require.Error(t, err)
		require.Contains(t, out, "PERMISSION_DENIED")
		require.Contains(t, out, "cannot read Cloud Scheduler job outbox-relay")
		require.NotContains(t, strings.Join(b.calls(t), "\n"), "scheduler jobs create")
	})

	t.Run("fails when its very last call is denied", func(t *testing.T) {
		t.Parallel()
		b := setupDeploy(t)
		out, err := b.run(t, "FAKE_DENY=services describe createuser")
		require.Error(t, err, out)
		require.Contains(t, out, "deploy: failed: gcloud run services describe createuser")
		require.NotContains(t, out, "== done")
	})

	t.Run("stops at the first call that is denied, naming it", func(t *testing.T) {
		t.Parallel()
		b := setupDeploy(t)
		out, err := b.run(t, "FAKE_DENY=builds submit")
		require.Error(t, err)
		require.Contains(t, out, "deploy: failed: gcloud builds submit")
		require.Contains(t, out, "permission denied")
		require.Len(t, b.calls(t), 1, "nothing runs after the denied build")
	})

	t.Run("refuses a value with a newline before building anything", func(t *testing.T) {
		t.Parallel()
		b := setupDeploy(t)
		out, err := b.run(t, "MAIL_FROM=Ops\nX-Injected: yes <a@example.com>")
		require.Error(t, err)
		require.Contains(t, out, "MAIL_FROM must be one line")
		_, statErr := os.Stat(b.log)
		require.True(t, os.IsNotExist(statErr), "gcloud was never called")
	})
}
