// Package deploy holds the container image and Cloud Run manifests; this
// test keeps the manifests honest about the configuration the code reads.
package deploy

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"

	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/config"
	"github.com/outboxfn/outbox/shared/serve"
)

type manifest struct {
	Kind     string `yaml:"kind"`
	Metadata struct {
		Name        string            `yaml:"name"`
		Annotations map[string]string `yaml:"annotations"`
	} `yaml:"metadata"`
	Spec struct {
		Template struct {
			Metadata struct {
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"metadata"`
			Spec struct {
				Containers []container `yaml:"containers"`
				// A Job nests one more template.
				Template struct {
					Spec struct {
						MaxRetries *int        `yaml:"maxRetries"`
						Containers []container `yaml:"containers"`
					} `yaml:"spec"`
				} `yaml:"template"`
			} `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type container struct {
	Image         string `yaml:"image"`
	StartupProbe  *probe `yaml:"startupProbe"`
	LivenessProbe *probe `yaml:"livenessProbe"`
	Env           []struct {
		Name  string `yaml:"name"`
		Value string `yaml:"value"`
	} `yaml:"env"`
}

type probe struct {
	HTTPGet *struct {
		Path string `yaml:"path"`
	} `yaml:"httpGet"`
}

func (m manifest) containers() []container {
	if m.Kind == "Job" {
		return m.Spec.Template.Spec.Template.Spec.Containers
	}
	return m.Spec.Template.Spec.Containers
}

func (m manifest) env() map[string]string {
	env := map[string]string{}
	for _, c := range m.containers() {
		for _, e := range c.Env {
			env[e.Name] = e.Value
		}
	}
	return env
}

func variables(t *testing.T, specs ...any) []string {
	t.Helper()
	var all []string
	for _, s := range specs {
		v, err := config.Variables(s)
		require.NoError(t, err)
		all = append(all, v...)
	}
	return all
}

func TestManifests(t *testing.T) {
	functions := map[string]struct {
		spec     any
		required []string
	}{
		createuser.Name: {&createuser.Config{}, []string{"DATABASE_URL"}},
		relay.Name:      {&relay.Config{}, []string{"DATABASE_URL", "REDIS_URL"}},
		sendemail.Name:  {&sendemail.Config{}, []string{"DATABASE_URL", "REDIS_URL", "SMTP_URL", "MAIL_FROM"}},
	}
	files, err := filepath.Glob("cloudrun/*.yaml")
	require.NoError(t, err)
	require.Len(t, files, 4)
	served := map[string]bool{}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			require.NoError(t, err)
			var m manifest
			require.NoError(t, yaml.Unmarshal(raw, &m))
			env := m.env()
			for _, reserved := range []string{"PORT", "K_SERVICE", "K_REVISION"} {
				require.NotContains(t, env, reserved, "Cloud Run sets %s itself", reserved)
			}

			for _, c := range m.containers() {
				require.Equal(t, "${IMAGE}", c.Image, "deploy.sh fills in the image by digest")
			}
			if m.Kind == "Job" {
				retries := m.Spec.Template.Spec.Template.Spec.MaxRetries
				require.NotNil(t, retries)
				require.GreaterOrEqual(t, *retries, 3, "Cloud Run can mark a task that succeeded as retried; Google recommends 3 or more")
				require.Contains(t, env, "DATABASE_URL", "the migration job needs the database")
				known := variables(t, &createuser.Config{})
				for name := range env {
					require.Contains(t, known, name, "%s sets %s, which nothing reads", file, name)
				}
				return
			}

			for _, c := range m.containers() {
				for kind, p := range map[string]*probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe} {
					require.NotNil(t, p, "%s declares a %s probe", file, kind)
					require.NotNil(t, p.HTTPGet, "%s: the %s probe asks HTTP", file, kind)
					require.Equal(t, serve.LivePath, p.HTTPGet.Path, "%s: the %s probe asks the liveness path, which ignores PostgreSQL and Redis", file, kind)
					require.False(t, strings.HasSuffix(p.HTTPGet.Path, "z") || strings.HasPrefix(p.HTTPGet.Path, "/_ah/") || p.HTTPGet.Path == "/eventlog",
						"Cloud Run reserves %s", p.HTTPGet.Path)
				}
			}

			target := env["FUNCTION_TARGET"]
			fn, ok := functions[target]
			require.True(t, ok, "FUNCTION_TARGET %q names no function", target)
			served[target] = true
			known := variables(t, &serve.Config{}, fn.spec)
			for name := range env {
				if strings.HasPrefix(name, "OTEL_") {
					continue // read by the OpenTelemetry SDK (see README: Observability)
				}
				require.Contains(t, known, name, "%s sets %s, which no config struct of %s reads", file, name, target)
			}
			for _, name := range fn.required {
				require.Contains(t, env, name, "%s must set %s: the default only works locally", file, name)
			}

			tmpl := m.Spec.Template.Metadata.Annotations
			ingress := m.Metadata.Annotations["run.googleapis.com/ingress"]
			if target == createuser.Name {
				require.Equal(t, "all", ingress, "createuser is public")
				require.Equal(t, "0", tmpl["autoscaling.knative.dev/minScale"], "createuser scales to zero")
				return
			}
			require.Equal(t, "internal", ingress, "%s must not be reachable from the internet", target)
			require.NotEqual(t, "0", tmpl["autoscaling.knative.dev/minScale"], "%s keeps an instance for its loop", target)
			require.Equal(t, "false", tmpl["run.googleapis.com/cpu-throttling"], "%s needs CPU between requests", target)
		})
	}
	served2 := make([]string, 0, len(served))
	for name := range served {
		served2 = append(served2, name)
	}
	slices.Sort(served2)
	require.Equal(t, "CreateUser,Relay,SendEmail", strings.Join(served2, ","), "every function has a manifest")
}
