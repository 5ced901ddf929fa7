// Command kstatus prints what sigs.k8s.io/cli-utils' kstatus library (the status rules
// Flux, kapply and kpt use) computes for one object: status.Compute, unchanged.
//
// Usage:
//
//	kstatus RESOURCE NAMESPACE NAME   read the object from the API server (KUBECONFIG)
//	kstatus -                         read the object as JSON from stdin
//
// RESOURCE is a plural resource name, optionally with its group ("imagebatches" or
// "imagebatches.imagebatch.dev"), resolved through the API server's discovery as kubectl
// does. The output is one line of JSON: {"status", "message", "conditions", "object"},
// where object is exactly what was evaluated, so a caller can compare the library's
// verdict with the fields it was computed from. Exit status 0 when a status was
// computed (whatever it is), 1 when the object could not be read or evaluated
// (NotFound is a status, printed with exit 0 and no object).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type output struct {
	Status     string                 `json:"status"`
	Message    string                 `json:"message"`
	Conditions []status.Condition     `json:"conditions"`
	Object     map[string]interface{} `json:"object,omitempty"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "kstatus: "+format+"\n", args...)
	os.Exit(1)
}

func fromStdin() *unstructured.Unstructured {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading stdin: %v", err)
	}
	// Decoded as the API machinery decodes objects (whole numbers as int64), which is
	// what status.Compute reads generation and observedGeneration as.
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(data); err != nil {
		fail("stdin is not a Kubernetes object in JSON: %v", err)
	}
	return obj
}

// fromCluster reads one object; nil when it does not exist.
func fromCluster(resource, namespace, name string) *unstructured.Unstructured {
	rules := clientcmd.NewDefaultClientConfigLoadingRules() // honours KUBECONFIG
	config, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
		rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		fail("kubeconfig: %v", err)
	}
	config.Timeout = 30 * time.Second
	disco, err := discovery.NewDiscoveryClientForConfig(config)
	if err != nil {
		fail("discovery client: %v", err)
	}
	groups, err := restmapper.GetAPIGroupResources(disco)
	if err != nil {
		fail("discovery: %v", err)
	}
	mapper := restmapper.NewDiscoveryRESTMapper(groups)
	plural, group, _ := strings.Cut(resource, ".")
	gvr, err := mapper.ResourceFor(schema.GroupVersionResource{Group: group, Resource: plural})
	if err != nil {
		fail("resource %q: %v", resource, err)
	}
	client, err := dynamic.NewForConfig(config)
	if err != nil {
		fail("dynamic client: %v", err)
	}
	obj, err := client.Resource(gvr).Namespace(namespace).Get(
		context.Background(), name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		fail("get %s %s/%s: %v", resource, namespace, name, err)
	}
	return obj
}

func main() {
	var obj *unstructured.Unstructured
	switch {
	case len(os.Args) == 2 && os.Args[1] == "-":
		obj = fromStdin()
	case len(os.Args) == 4:
		obj = fromCluster(os.Args[1], os.Args[2], os.Args[3])
	default:
		fmt.Fprintln(os.Stderr, "usage: kstatus RESOURCE NAMESPACE NAME | kstatus -")
		os.Exit(2)
	}
	out := output{Conditions: []status.Condition{}}
	if obj == nil {
		out.Status, out.Message = status.NotFoundStatus.String(), "Resource not found"
	} else {
		result, err := status.Compute(obj)
		if err != nil {
			fail("status.Compute: %v", err)
		}
		out.Status, out.Message, out.Object = result.Status.String(), result.Message, obj.Object
		if result.Conditions != nil {
			out.Conditions = result.Conditions
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing output: %v", err)
	}
}
